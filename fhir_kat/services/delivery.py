"""Outbound delivery wiring: what the artifact service queues, and the consent gate the
delivery worker asks at send time — the same decision point as reads, searches and $export.

Owns: ``consent_gate`` (a patient's active privacy Consents must permit the partner's
Organization for the purpose, now), ``queue_artifact``, and ``requeue_on_consent`` (a Consent
written for a patient releases that patient's consent-blocked deliveries, in the same
transaction). Must not: send anything (the worker
in ``fhir_kat.exchange`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from fhir_kat.exchange import Delivery, PartnerConfig, enqueue_artifact
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
) -> dict[str, int]:
    """Queue a stored artifact for every partner that wants it, in the caller's transaction.
    Patient data for a party outside the program is consent-checked again at send time (under
    ``purpose_for(kind)``); data about no patient, or for the program's care team, is not."""
    if not partners:
        return {}
    purpose = purpose_for(kind) if patient_id else None
    return enqueue_artifact(tx, partners, kind, resources, patient_id, consent_purpose=purpose)


def requeue_on_consent(tx: Tx, stored: StoredResource, _created: bool) -> None:
    """A write hook: a Consent created or updated for a patient sends that patient's
    consent-blocked deliveries again (the gate decides again at send time, so a Consent that
    still says no blocks them again, and one that says yes lets them through)."""
    if stored.type == "Consent" and not stored.deleted and stored.patient_id:
        requeue_blocked(tx, stored.patient_id)
