"""Routing: which partners receive an artifact, and the delivery each one gets.

Owns: ``enqueue_artifact``, the one call the artifact service makes after storing an artifact,
inside the same write transaction (which also resolves references to resources stored
earlier into conditional references). Must not: send anything, or swallow an artifact that cannot
be delivered exactly once (a resource without an identifier, a partner filter that cuts a
reference): that raises ``Unprocessable`` and the caller's transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fhir_kat.exchange.bundles import for_partner, resources_of, task_update_transaction
from fhir_kat.exchange.outbox import enqueue
from fhir_kat.exchange.partners import REFERRAL_STATUS, PartnerConfig
from fhir_kat.store import Tx


def enqueue_artifact(
    tx: Tx,
    partners: Mapping[str, PartnerConfig],
    artifact_kind: str,
    artifact: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    patient_key: str | None,
    consent_purpose: str | None = None,
) -> dict[str, int]:
    """Queue ``artifact`` (a Bundle or a list of resources with our ids and identifiers) for
    every enabled partner whose ``artifact_kinds`` include ``artifact_kind`` and which accepts
    at least one of its resource types; returns ``{partner: delivery id}``.

    With ``consent_purpose`` (a v3 PurposeOfUse code such as ``TREAT``) each delivery carries
    the consent question to ask again at send time: ``{"patient": patient_key, "partner":
    name, "actor": partner.organization, "purpose": consent_purpose}``.
    """
    if consent_purpose is not None and patient_key is None:
        raise ValueError("a consent check needs the patient_key")
    types = {r.get("resourceType") for r in resources_of(artifact)}

    resolve = _resolver(tx)
    queued: dict[str, int] = {}
    for name in sorted(partners):
        partner = partners[name]
        if not partner.wants(artifact_kind):
            continue
        if not any(isinstance(t, str) and partner.accepts_type(t) for t in types):
            continue
        bundle = for_partner(partner, artifact, resolve)
        check = _consent_check(patient_key, name, partner, consent_purpose)
        queued[name] = enqueue(tx, name, "bundle", bundle, patient_key, check)
    return queued


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

    resolve = _resolver(tx)
    queued: dict[str, int] = {}
    for name in referrer_partners(partners, referrer_organizations):
        bundle = task_update_transaction(task, resolve, document)
        check = _consent_check(patient_key, name, partners[name], consent_purpose)
        queued[name] = enqueue(tx, name, "bundle", bundle, patient_key, check)
    return queued


def _resolver(tx: Tx) -> Callable[[str, str], dict[str, Any] | None]:
    """Reads a referenced resource in the caller's transaction (None when absent or deleted),
    so the wire form can turn references into conditional ones by identifier."""

    def resolve(rtype: str, rid: str) -> dict[str, Any] | None:
        stored = tx.get(rtype, rid)
        return stored.json() if stored is not None and not stored.deleted else None

    return resolve


def _consent_check(
    patient_key: str | None, name: str, partner: PartnerConfig, purpose: str | None
) -> dict[str, Any] | None:
    """The consent question the worker asks again at send time (None: no patient data)."""
    if purpose is None:
        return None
    return {
        "patient": patient_key,
        "partner": name,
        "actor": partner.organization,
        "purpose": purpose,
    }


__all__ = ["enqueue_artifact", "enqueue_referral_status", "referrer_partners"]
