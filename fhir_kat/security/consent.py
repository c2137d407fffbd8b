"""The consent decision point: may this party see this patient's data, for this purpose?

Deny by default for disclosure outside the program. Only ``active`` Consents whose scope is
``patient-privacy`` count; a Consent decides when its base provision applies to the request
(period covers now; actor, purpose and class match when given), and nested provisions that
apply override their parent (FHIR R4 Consent, "provision" exceptions). Across several Consents
of one patient a deny wins over a permit. The same function serves reads, searches, _include,
$export, outbound deliveries and referrer feedback.

Consents are read once and cached until a Consent is written again (the cache key is the
newest Consent version's write sequence and the count), so a revocation takes effect on the next
request. Only read transactions fill the cache: a write transaction may see Consents that roll
back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import false, func, select

from fhir_kat.search import (
    Criterion,
    SearchQuery,
    parse_date_range,
    split_reference,
    utc_naive,
)
from fhir_kat.store import Tx
from fhir_kat.store.schema import resources

PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
PRIVACY_SCOPE = "patient-privacy"


@dataclass(frozen=True)
class Actor:
    """Who would receive the data: literal references and identifiers ("system|value")."""

    references: frozenset[str]
    identifiers: frozenset[str]


def organization_ids(tx: Tx, organization: str) -> list[str]:
    """Ids of the stored Organizations carrying the identifier ``system|value``."""
    system, _, value = organization.partition("|")
    query = SearchQuery(
        "Organization",
        criteria=(Criterion("identifier", "token", "", ((system, value, True),), ""),),
        count=100,
    )
    rows = tx.matches(query)
    return [r.id for r in rows]


def actor_for(tx: Tx, organization: str | None) -> Actor | None:
    """A party (client or partner) as a Consent actor: its Organization identifier and the
    stored Organizations that carry it; None when it names no Organization."""
    if not organization:
        return None
    refs = frozenset(f"Organization/{oid}" for oid in organization_ids(tx, organization))
    return Actor(refs, frozenset({organization}))


def applies(
    provision: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> bool:
    period = provision.get("period")
    if period and not _period_covers(period, now):
        return False
    actors = provision.get("actor")
    if actors and not any(_actor_matches(a.get("reference", {}), actor) for a in actors):
        return False
    purposes = provision.get("purpose")
    if purposes and not any(
        p.get("code") == purpose and p.get("system", PURPOSE_SYSTEM) == PURPOSE_SYSTEM
        for p in purposes
    ):
        return False
    classes = provision.get("class")
    return not classes or any(
        c.get("code") == rtype and c.get("system", RESOURCE_TYPES_SYSTEM) == RESOURCE_TYPES_SYSTEM
        for c in classes
    )


def evaluate_provision(
    provision: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> str | None:
    """ "permit", "deny", or None when the provision does not apply to this request."""
    if not applies(provision, actor, purpose, rtype, now):
        return None
    decision: str | None = provision.get("type")
    for child in provision.get("provision", []):
        nested = evaluate_provision(child, actor, purpose, rtype, now)
        if nested == "deny":
            return "deny"  # an applicable nested deny is the narrowest rule: it wins
        if nested == "permit":
            decision = "permit"
    return decision


def consent_decision(
    consent: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> str | None:
    if consent.get("status") != "active":
        return None
    scope = {c.get("code") for c in consent.get("scope", {}).get("coding", [])}
    if PRIVACY_SCOPE not in scope:
        return None  # a treatment consent governs care, not disclosure
    provision = consent.get("provision")
    if not provision:
        return None
    return evaluate_provision(provision, actor, purpose, rtype, now)


def decide(
    consents: Iterable[Mapping[str, Any]], actor: Actor, purpose: str, rtype: str, now: datetime
) -> bool:
    decisions = {consent_decision(c, actor, purpose, rtype, now) for c in consents}
    return "permit" in decisions and "deny" not in decisions


def _actor_matches(reference: Mapping[str, Any], actor: Actor) -> bool:
    literal = reference.get("reference")
    if isinstance(literal, str):
        target = split_reference(literal)
        if target and f"{target[0]}/{target[1]}" in actor.references:
            return True
    identifier = reference.get("identifier")
    if isinstance(identifier, Mapping):
        return f"{identifier.get('system', '')}|{identifier.get('value', '')}" in actor.identifiers
    return False


def _period_covers(period: Mapping[str, Any], now: datetime) -> bool:
    moment = utc_naive(now)
    start = parse_date_range(period["start"]) if "start" in period else None
    end = parse_date_range(period["end"]) if "end" in period else None
    if start and moment < start[0]:
        return False
    return not (end and moment > end[1])


class ConsentDecisionPoint:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: tuple[int | None, int] | None = None
        self._by_patient: dict[str, list[dict[str, Any]]] = {}

    def _consents(self, tx: Tx) -> dict[str, list[dict[str, Any]]]:
        version_row = tx.conn.execute(
            select(func.max(resources.c.seq), func.count()).where(resources.c.res_type == "Consent")
        ).one()
        version = (version_row[0], int(version_row[1]))
        with self._lock:
            if version == self._version:
                return self._by_patient
        by_patient: dict[str, list[dict[str, Any]]] = {}
        rows = tx.conn.execute(
            select(resources.c.patient_id, resources.c.content).where(
                resources.c.res_type == "Consent",
                resources.c.deleted == false(),
                resources.c.patient_id.is_not(None),
            )
        )
        for patient_id, content in rows:
            by_patient.setdefault(patient_id, []).append(json.loads(content))
        if tx.conn.get_execution_options().get("kat_write"):
            # A write transaction sees its own uncommitted Consents. Were they cached, a rollback
            # could leave them behind under a key a later commit reuses (SQLite hands out a
            # rolled-back seq again), so only committed state seen by a reader is kept.
            return by_patient
        with self._lock:
            self._version, self._by_patient = version, by_patient
        return by_patient

    def permits(
        self, tx: Tx, patient_id: str, actor: Actor, purpose: str, rtype: str, now: datetime
    ) -> bool:
        return decide(self._consents(tx).get(patient_id, []), actor, purpose, rtype, now)

    def visible_patients(
        self, tx: Tx, actor: Actor, purpose: str, rtype: str, now: datetime
    ) -> set[str]:
        return {
            patient
            for patient, consents in self._consents(tx).items()
            if decide(consents, actor, purpose, rtype, now)
        }
