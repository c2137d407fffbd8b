"""Routing: which partners receive an artifact, and the delivery each one gets.

Owns: ``enqueue_artifact`` and ``enqueue_referral_status``, called inside the write
transaction that stores what they queue, and ``wire_form``, which the worker calls when a
delivery is sent. What a partner receives, and how, is decided only then (outbound never
vetoes inbound): queueing records the resources as stored; the partner's transaction Bundle
— conditional create or PUT, references made conditional from what is stored — is built at
send time, and a delivery that cannot be put in the partner's form is dead-lettered there,
with a reason an operator reads, while the clinical record it came from stays stored.

Must not: send anything, or refuse a write because of a partner's configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fhir_kat.errors import Unprocessable, issue
from fhir_kat.exchange.bundles import (
    Resolve,
    for_partner,
    full_url_for,
    resources_of,
    task_update_transaction,
)
from fhir_kat.exchange.copies import record
from fhir_kat.exchange.outbox import ARTIFACT, REFERRAL_STATUS_KIND, enqueue
from fhir_kat.exchange.partners import REFERRAL_STATUS, PartnerConfig
from fhir_kat.store import Tx


def enqueue_artifact(
    tx: Tx,
    partners: Mapping[str, PartnerConfig],
    artifact_kind: str,
    artifact: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    patient_key: str | None,
    consent_purpose: str | None = None,
    derived: Sequence[Mapping[str, Any]] = (),
) -> dict[str, int]:
    """Queue ``artifact`` (a Bundle or a list of resources with our ids and identifiers) for
    every enabled partner whose ``artifact_kinds`` include ``artifact_kind`` and which accepts
    at least one of its resource types; returns ``{partner: delivery id}``.

    With ``consent_purpose`` (a v3 PurposeOfUse code such as ``TREAT``) each delivery to a
    partner outside the program carries the consent question to ask again at send time:
    ``{"patient": patient_key, "partner": name, "actor": partner.organization, "purpose":
    consent_purpose}``. A ``care_team`` partner gets none (a disclosure inside the program's
    care team, for treatment).

    ``derived``: resources the program derived from the artifact (score Observations and the
    Provenance of their extraction); they travel with it unless the partner's
    ``derived_resources`` is ``none`` (decided at send time).

    Each resource queued is recorded as the partner's copy (``copies.record``), so its later
    versions follow it (``services/delivery.PartnerCopies``).

    Nothing here can refuse the artifact: the payload is the resources as stored, and their
    wire form is built when the delivery is sent (``wire_form``).
    """
    if consent_purpose is not None and patient_key is None:
        raise ValueError("a consent check needs the patient_key")
    resources = resources_of(artifact)
    types = {r.get("resourceType") for r in resources}
    payload: dict[str, Any] = {"artifactKind": artifact_kind, "artifact": artifact}
    if derived:
        payload["derived"] = [dict(r) for r in derived]
    queued: dict[str, int] = {}
    for name in sorted(partners):
        partner = partners[name]
        if not partner.wants(artifact_kind):
            continue
        if not any(isinstance(t, str) and partner.accepts_type(t) for t in types):
            continue
        check = _consent_check(patient_key, name, partner, consent_purpose)
        queued[name] = enqueue(tx, name, ARTIFACT, payload, patient_key, check)
        record(tx, name, artifact_kind, patient_key, [*resources, *derived])
    return queued


def wire_form(
    kind: str, payload: Mapping[str, Any], partner: PartnerConfig, resolve: Resolve
) -> dict[str, Any]:
    """The transaction Bundle a delivery sends to ``partner`` now, built from what was queued
    and what is stored (``resolve``); ``Unprocessable`` names each reason it cannot be sent
    in this partner's form (the worker dead-letters it with them). Deliveries queued as a
    finished ``bundle`` or ``notification`` are sent as they are."""
    if kind == ARTIFACT:
        artifact = payload.get("artifact")
        if not isinstance(artifact, Mapping | list):
            raise Unprocessable(issue("structure", "the queued artifact is missing"))
        derived = payload.get("derived")
        if isinstance(derived, list) and derived and partner.derived_resources == "with-source":
            artifact = with_derived(artifact, derived, partner)
        return for_partner(partner, artifact, resolve)
    if kind == REFERRAL_STATUS_KIND:
        task, document = payload.get("task"), payload.get("document")
        if not isinstance(task, Mapping):
            raise Unprocessable(issue("structure", "the queued Task is missing"))
        return task_update_transaction(
            task, resolve, document if isinstance(document, Mapping) else None
        )
    return dict(payload)


def with_derived(
    artifact: Mapping[str, Any] | list[Any],
    derived: list[Any],
    partner: PartnerConfig,
) -> Mapping[str, Any] | list[Any]:
    """The artifact followed by the derived resources this partner accepts (its
    ``resource_types``); a derived Provenance goes only with every derived resource it is
    about (a Provenance pointing at a resource left out would dead-letter the delivery)."""
    offered = [r for r in derived if isinstance(r, Mapping)]
    kept = [r for r in offered if partner.accepts_type(str(r.get("resourceType")))]
    every = {_key(r) for r in offered}
    names = {_key(r) for r in kept}
    kept = [
        r
        for r in kept
        if r.get("resourceType") != "Provenance"
        or all(ref in names for ref in _targets(r) if ref in every)
    ]
    if not kept:
        return artifact
    if isinstance(artifact, Mapping):
        extra = [{"fullUrl": full_url_for(*_key(r).split("/", 1)), "resource": r} for r in kept]
        return {**artifact, "entry": [*artifact.get("entry", []), *extra]}
    return [*artifact, *kept]


def _key(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _targets(provenance: Mapping[str, Any]) -> list[str]:
    return [
        str(t.get("reference"))
        for t in provenance.get("target", [])
        if isinstance(t, Mapping) and isinstance(t.get("reference"), str)
    ]


def referrer_partners(
    partners: Mapping[str, PartnerConfig], referrer_organizations: set[str]
) -> list[str]:
    """The enabled partners that stand for one of these referrer Organizations
    (``system|value``) and asked for referral status by name (``artifact_kinds``)."""
    return [
        name
        for name in sorted(partners)
        if partners[name].enabled
        and partners[name].artifact_kinds is not None
        and REFERRAL_STATUS in (partners[name].artifact_kinds or ())
        and partners[name].organization in referrer_organizations
    ]


def enqueue_referral_status(
    tx: Tx,
    partners: Mapping[str, PartnerConfig],
    task: Mapping[str, Any],
    referrer_organizations: set[str],
    patient_key: str | None,
    document: Mapping[str, Any] | None = None,
    consent_purpose: str | None = None,
) -> dict[str, int]:
    """Queue the referral Task's current state for the referrer's registered endpoint(s), in
    the caller's transaction (``task_update_transaction``); returns ``{partner: delivery id}``.

    The status alone goes without a consent check: the referrer sent the referral and follows
    it. A ``document`` (clinical content) must come with ``consent_purpose``: the delivery then
    asks the consent question again at send time, with the partner's Organization as actor.
    """
    if document is not None and (consent_purpose is None or patient_key is None):
        raise ValueError("a feedback document is sent only under a consent check")

    payload = {"task": dict(task), "document": dict(document) if document else None}
    queued: dict[str, int] = {}
    for name in referrer_partners(partners, referrer_organizations):
        check = _consent_check(patient_key, name, partners[name], consent_purpose)
        queued[name] = enqueue(tx, name, REFERRAL_STATUS_KIND, payload, patient_key, check)
    return queued


def resolver(tx: Tx) -> Callable[[str, str], dict[str, Any] | None]:
    """Reads a referenced resource in ``tx`` (None when absent or deleted), so the wire form
    can turn references into conditional ones by identifier."""

    def resolve(rtype: str, rid: str) -> dict[str, Any] | None:
        stored = tx.get(rtype, rid)
        return stored.json() if stored is not None and not stored.deleted else None

    return resolve


def _consent_check(
    patient_key: str | None, name: str, partner: PartnerConfig, purpose: str | None
) -> dict[str, Any] | None:
    """The consent question the worker asks again at send time (None: no patient data, or a
    disclosure to the program's own care team)."""
    if purpose is None or partner.care_team:
        return None
    return {
        "patient": patient_key,
        "partner": name,
        "actor": partner.organization,
        "purpose": purpose,
    }


__all__ = [
    "enqueue_artifact",
    "enqueue_referral_status",
    "referrer_partners",
    "resolver",
    "wire_form",
    "with_derived",
]
