"""Roles as data: what each role may do, before scopes and consent narrow it further.

A request is allowed when the role allows it AND a granted scope allows it; then consent
(``consent.py``) decides which patients' data a party outside the program may see.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("referrer", "program-staff", "health-authority", "admin")

#: Resource types that describe no patient and carry no clinical content.
REFERENCE_DATA = frozenset(
    {"Organization", "Practitioner", "PractitionerRole", "Endpoint", "Questionnaire", "Measure"}
)
CLINICAL = frozenset(
    {
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "ClinicalImpression",
        "Communication",
        "Composition",
        "Condition",
        "Consent",
        "DocumentReference",
        "Encounter",
        "Flag",
        "Group",
        "MeasureReport",
        "Medication",
        "MedicationAdministration",
        "Observation",
        "Patient",
        "Provenance",
        "QuestionnaireResponse",
        "ServiceRequest",
        "Task",
    }
)

#: role -> resource type ("*" = any type not named) -> letters (c r u d s).
FHIR_RULES: dict[str, dict[str, str]] = {
    # A referrer sends referrals (a transaction of these types) and follows the Tasks and
    # ServiceRequests it sent (filtered to its own organisation), through reads or Subscriptions,
    # and reads the Patients those referrals are about (ADR 0027; ``Access.referred_patients``).
    "referrer": {
        "Patient": "crus",
        "Practitioner": "cu",
        "PractitionerRole": "cu",
        "Organization": "cu",
        "Endpoint": "cu",
        "Condition": "cu",
        # A ketamine hypersensitivity travels as an AllergyIntolerance (DOMAIN.md).
        "AllergyIntolerance": "cu",
        "Consent": "cu",
        "QuestionnaireResponse": "cu",
        "Observation": "cu",
        "DocumentReference": "cu",
        "ServiceRequest": "crus",
        "Task": "crus",
        "Subscription": "cruds",
    },
    "program-staff": {"*": "cruds", "AuditEvent": "", "Subscription": "rs"},
    # The health authority reads and searches; patient data only as consent permits.
    "health-authority": {
        **{t: "rs" for t in CLINICAL | REFERENCE_DATA},
        "Subscription": "cruds",
    },
    "admin": {
        "AuditEvent": "rs",
        "Subscription": "rs",
        "Endpoint": "cruds",
        "Organization": "cruds",
    },
}

#: Native API areas and FHIR operations per role.
AREAS: dict[str, frozenset[str]] = {
    "referrer": frozenset({"artifacts:referrals"}),
    "program-staff": frozenset({"artifacts:*", "operations:*"}),
    "health-authority": frozenset({"operations:export", "operations:measure"}),
    "admin": frozenset({"deliveries", "audit"}),
}

#: Who counts as outside the program (disclosure to them needs the patient's consent).
OUTSIDE_PROGRAM = frozenset({"referrer", "health-authority"})


@dataclass(frozen=True)
class RoleDecision:
    allowed: bool
    reason: str = ""


def role_allows(role: str, resource_type: str, letter: str) -> bool:
    rules = FHIR_RULES.get(role, {})
    letters = rules.get(resource_type, rules.get("*", ""))
    return letter in letters


def area_allowed(role: str, area: str) -> bool:
    areas = AREAS.get(role, frozenset())
    kind = area.split(":", 1)[0]
    return area in areas or f"{kind}:*" in areas
