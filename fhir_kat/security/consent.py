"""The consent decision point: may this party see this patient's data, for this purpose?

Deny by default for disclosure outside the program. Only ``active`` Consents whose scope is
``patient-privacy`` count; a Consent decides when its base provision applies to the request
(period covers now; actor, purpose and class match when given), and nested provisions that
apply override their parent (FHIR R4 Consent, "provision" exceptions). Across several Consents
of one patient a deny wins over a permit. Permits narrowed by ``data`` (instances) or
``dataPeriod`` open a slice of the patient's data (``Grant``); restrictions not evaluated here
make a permit open nothing and a deny apply in full (docs/security.md, "Consent features"). The
same functions serve every read path (through ``Access.scope``), outbound deliveries and
referrer feedback.

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
_MEMO = "consent:by-patient"


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


#: v3 ActReason is the purpose system; consentaction the R4 Consent.provision.action system.
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
#: The actions a read, a search, an export or a delivery is (R4 consentaction: access =
#: "retrieval without permitting collection, use or disclosure", disclose = "release").
READ_ACTIONS = frozenset({"access", "disclose"})
#: Provision elements this decision point does not evaluate. A permit restricted by one of
#: them does not apply (deny by default: we cannot tell what it opens); a deny restricted by
#: one applies in full (denying more than it says is the safe side).
NOT_EVALUATED = ("securityLabel", "code")


@dataclass(frozen=True)
class Grant:
    """What a permit opens of one patient's data of one type: everything (``full``), or a
    slice — the resources ``provision.data`` names (meaning ``instance``) and those whose
    date lies in a ``provision.dataPeriod``."""

    full: bool = False
    references: frozenset[str] = frozenset()
    periods: tuple[tuple[datetime | None, datetime | None], ...] = ()

    def __or__(self, other: Grant) -> Grant:
        if self.full or other.full:
            return FULL
        return Grant(
            references=self.references | other.references,
            periods=tuple(dict.fromkeys(self.periods + other.periods)),
        )


FULL = Grant(full=True)


def applies(
    provision: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> bool:
    """Whether the provision's period, actor, purpose and class cover this request (each
    left out covers everything)."""
    return _matches(provision, actor, purpose, rtype, now) is not False


def _matches(
    provision: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> bool | None:
    """True (every stated restriction covers the request), False (one does not), None (it
    covers the request as far as it is understood, but names a class in a system other than
    resource types, which cannot be judged)."""
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
    if not classes:
        return True
    if any(
        c.get("code") == rtype and c.get("system", RESOURCE_TYPES_SYSTEM) == RESOURCE_TYPES_SYSTEM
        for c in classes
    ):
        return True
    if all(c.get("system", RESOURCE_TYPES_SYSTEM) == RESOURCE_TYPES_SYSTEM for c in classes):
        return False
    return None


def _permit_grant(provision: Mapping[str, Any]) -> Grant | None:
    """What a permit that covers the request opens, or None when a restriction on it cannot
    be evaluated here (then it opens nothing)."""
    if any(provision.get(name) for name in NOT_EVALUATED):
        return None
    actions = provision.get("action")
    if actions and not any(
        c.get("system") == ACTION_SYSTEM and c.get("code") in READ_ACTIONS
        for a in actions
        for c in a.get("coding", [])
    ):
        return None  # e.g. a permit to collect: not to read or release
    data = provision.get("data") or []
    period = provision.get("dataPeriod")
    if not data and not period:
        return FULL
    references: set[str] = set()
    for item in data:
        if item.get("meaning") != "instance":
            return None  # related / dependents / authoredby: not evaluated
        target = split_reference(item.get("reference", {}).get("reference", ""))
        if target is None:
            return None
        references.add(f"{target[0]}/{target[1]}")
    periods: tuple[tuple[datetime | None, datetime | None], ...] = ()
    if period:
        start = parse_date_range(period["start"]) if "start" in period else None
        end = parse_date_range(period["end"]) if "end" in period else None
        if (period.get("start") and start is None) or (period.get("end") and end is None):
            return None
        periods = ((start[0] if start else None, end[1] if end else None),)
    if data and period:
        return None  # both at once (data within a period): not evaluated
    return Grant(references=frozenset(references), periods=periods)


def evaluate_provision(
    provision: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> Grant | str | None:
    """``"deny"``, the ``Grant`` of a permit, or None when the provision does not apply to
    this request. Nested provisions that apply override their parent; an applicable nested
    deny is the narrowest rule and wins."""
    matched = _matches(provision, actor, purpose, rtype, now)
    kind = provision.get("type")
    if matched is False or (matched is None and kind != "deny"):
        return None
    decision: Grant | str | None = None
    if kind == "deny":
        decision = "deny"
    elif kind == "permit":
        decision = _permit_grant(provision)
    for child in provision.get("provision", []):
        nested = evaluate_provision(child, actor, purpose, rtype, now)
        if nested == "deny":
            return "deny"
        if isinstance(nested, Grant):
            decision = nested | decision if isinstance(decision, Grant) else nested
    return decision


def consent_decision(
    consent: Mapping[str, Any], actor: Actor, purpose: str, rtype: str, now: datetime
) -> Grant | str | None:
    if consent.get("status") != "active":
        return None
    scope = {c.get("code") for c in consent.get("scope", {}).get("coding", [])}
    if PRIVACY_SCOPE not in scope:
        return None  # a treatment consent governs care, not disclosure
    provision = consent.get("provision")
    if not provision:
        return None
    return evaluate_provision(provision, actor, purpose, rtype, now)


def grant(
    consents: Iterable[Mapping[str, Any]], actor: Actor, purpose: str, rtype: str, now: datetime
) -> Grant | None:
    """What a patient's Consents open to ``actor`` of its ``rtype`` data for ``purpose``:
    None (nothing: no permit applies, or any applicable deny), or the union of the permits."""
    opened: Grant | None = None
    for consent in consents:
        decision = consent_decision(consent, actor, purpose, rtype, now)
        if decision == "deny":
            return None
        if isinstance(decision, Grant):
            opened = decision | opened if opened is not None else decision
    if opened is None or not (opened.full or opened.references or opened.periods):
        return None
    return opened


def decide(
    consents: Iterable[Mapping[str, Any]], actor: Actor, purpose: str, rtype: str, now: datetime
) -> bool:
    """Whether the Consents open *all* of the patient's ``rtype`` data (a slice is not)."""
    opened = grant(consents, actor, purpose, rtype, now)
    return opened is not None and opened.full


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
        mine = tx.memo.get(_MEMO)
        if mine is not None and mine[0] == version:
            return dict(mine[1])
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
            # rolled-back seq again), so only committed state seen by a reader is kept — and,
            # for this transaction alone, what it read (until it writes a Consent).
            tx.memo[_MEMO] = (version, by_patient)
            return by_patient
        with self._lock:
            self._version, self._by_patient = version, by_patient
        return by_patient

    def permits(
        self, tx: Tx, patient_id: str, actor: Actor, purpose: str, rtype: str, now: datetime
    ) -> bool:
        return decide(self._consents(tx).get(patient_id, []), actor, purpose, rtype, now)

    def grants(
        self, tx: Tx, actor: Actor, purpose: str, rtype: str, now: datetime
    ) -> tuple[set[str], dict[str, Grant]]:
        """The patients whose ``rtype`` data the Consents open to ``actor`` in full, and those
        of whom they open a slice."""
        full: set[str] = set()
        slices: dict[str, Grant] = {}
        for patient, consents in self._consents(tx).items():
            opened = grant(consents, actor, purpose, rtype, now)
            if opened is None:
                continue
            if opened.full:
                full.add(patient)
            else:
                slices[patient] = opened
        return full, slices
