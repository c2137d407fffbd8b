"""The facts triage reads, from FHIR resources: one reading for every path that asks.

Owns: turning a patient's Conditions, AllergyIntolerances and referral-fact Observations (with
their HL7 status codes), the referral's coded reasons and the patient's birth date into
``ReferralFacts``. The referral workflow (``services/referrals``: resources from the store) and
the CDS Hooks service (``services/cds_hooks``: resources from the EHR's prefetch or FHIR server)
both call it, so a card and a triage decision read the same data the same way.
Must not: read the store, the clock or the network (callers gather the resources and the date).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any

from fhir_kat.search import parse_date_range
from fhir_kat.workflow.shapes import INTAKE
from fhir_kat.workflow.triage import Coding, Condition, ReferralFacts

CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
#: Referral facts (kat-intake codes) -> the flag names eligibility.yaml reads.
FACT_FLAGS = {
    "prior-treatment-failure": "prior_treatment_failure",
    "extreme-emotional-lability": "extreme_emotional_lability",
    "recent-mood-medication-change": "recent_mood_medication_change",
    "uncontrolled-hypertension": "uncontrolled",
    "uncontrolled-cardiopulmonary-disease": "uncontrolled_cardiopulmonary",
    "aneurysm": "aneurysm",
}


def chart_facts(
    resources: Iterable[Mapping[str, Any]],
    reason_codes: Iterable[Any] = (),
    age: int | None = None,
) -> ReferralFacts:
    """``ReferralFacts`` from a patient's resources (other types are ignored), the referral's
    ``reasonCode`` CodeableConcepts and the age in whole years (None = unknown)."""
    conditions: list[Condition] = []
    uncoded = 0
    allergies: list[Condition] = []
    flags: dict[str, bool | None] = {}
    for res in resources:
        codings = codings_of(res.get("code"))
        if res.get("resourceType") == "Condition":
            verification = status_of(res.get("verificationStatus"), CONDITION_VERIFICATION)
            if codings:
                conditions.append(
                    Condition(
                        codings,
                        status_of(res.get("clinicalStatus"), CONDITION_CLINICAL) or "active",
                        verification or "confirmed",
                    )
                )
            elif verification not in ("refuted", "entered-in-error"):
                uncoded += 1
        elif res.get("resourceType") == "AllergyIntolerance":
            substances = codings + tuple(
                c for r in res.get("reaction", []) for c in codings_of(r.get("substance"))
            )
            allergies.append(
                Condition(
                    substances,
                    status_of(res.get("clinicalStatus"), ALLERGY_CLINICAL) or "active",
                    status_of(res.get("verificationStatus"), ALLERGY_VERIFICATION) or "confirmed",
                )
            )
        elif res.get("resourceType") == "Observation":
            for c in codings:
                if c.system == INTAKE and c.code in FACT_FLAGS:
                    flags[FACT_FLAGS[c.code]] = res.get("valueBoolean")
    reasons = [Condition(codings_of(concept)) for concept in reason_codes]
    return ReferralFacts(
        tuple(conditions) + tuple(r for r in reasons if r.codings),
        uncoded,
        tuple(allergies),
        flags,
        age,
    )


def age_on(birth_date: str, on: date) -> int | None:
    """Whole years from a FHIR ``birthDate`` (``YYYY``, ``YYYY-MM`` or a full date: its first
    possible day) to ``on``; None when there is no usable birth date."""
    born = parse_date_range(birth_date or "")
    if born is None:
        return None
    birth = born[0].date()
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def latest_totals(
    scores: Iterable[Mapping[str, Any]], totals: Mapping[str, str], loinc: str
) -> list[str]:
    """``PHQ-9: 18 (2026-11-02)`` for the latest final total of each instrument among
    ``scores`` (``totals``: LOINC total code → instrument title), ordered by title."""
    latest: dict[str, tuple[str, Any]] = {}
    for obs in scores:
        if obs.get("status") not in ("final", "amended", "corrected"):
            continue
        value = (obs.get("valueQuantity") or {}).get("value", obs.get("valueInteger"))
        when = str(obs.get("effectiveDateTime") or "")
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        for c in (obs.get("code") or {}).get("coding") or []:
            title = totals.get(str(c.get("code"))) if c.get("system") == loinc else None
            if title and (title not in latest or when > latest[title][0]):
                latest[title] = (when, value)
    return [
        f"{title}: {value:g} ({when[:10] or 'date not recorded'})"
        for title, (when, value) in sorted(latest.items())
    ]


def codings_of(concept: Any) -> tuple[Coding, ...]:
    if not isinstance(concept, dict):
        return ()
    return tuple(
        Coding(str(c.get("system", "")), str(c.get("code", "")))
        for c in concept.get("coding", [])
        if isinstance(c, dict) and c.get("code")
    )


def status_of(concept: Any, system: str) -> str:
    return next((c.code for c in codings_of(concept) if c.system == system), "")
