"""What makes a resource a referral (the program's ServiceRequest and its Task) or a KaT session
booking (an Appointment of kat-service#kat-session).

Owns: the codes and shape tests both the workflow (``services.referrals``) and the access rules
(``services.access``) ask. Must not: read the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_kat.terminology import BASE

TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"
SERVICE = f"{BASE}/CodeSystem/kat-service"
INTAKE = f"{BASE}/CodeSystem/kat-intake"
#: Intake steps (kat-intake codes) a program clinician records; each moves the referral.
INTAKE_STEPS = frozenset({"nurse-intake", "psychiatrist-clearance", "contraindication-check"})


def is_referral_task(resource: Mapping[str, Any]) -> bool:
    if resource.get("resourceType") != "Task":
        return False
    return any(
        c.get("system") == TASK_CODES and c.get("code") == "fulfill"
        for c in resource.get("code", {}).get("coding", [])
    )


def is_program_referral(resource: Mapping[str, Any]) -> bool:
    return (
        resource.get("resourceType") == "ServiceRequest"
        and resource.get("intent") == "order"
        and any(
            c.get("system") == SERVICE and c.get("code") == "kat-program"
            for c in resource.get("code", {}).get("coding", [])
        )
    )


def is_intake_step(resource: Mapping[str, Any]) -> bool:
    """An Observation recording an intake step's decision (it moves the referral Task)."""
    return resource.get("resourceType") == "Observation" and any(
        c.get("system") == INTAKE and c.get("code") in INTAKE_STEPS
        for c in resource.get("code", {}).get("coding", [])
    )


#: The program's code for a KaT treatment session (kat-service), on its dosing Encounter and on
#: the Appointment that books it.
SESSION_CODE = "kat-session"
SESSION_NUMBER = f"{BASE}/StructureDefinition/session-number"
#: R4 appointmentstatus values that need start and end (app-3: only proposed or cancelled
#: appointments may lack them; waitlist too, R4 says of it the same as of proposed).
_TIMED = frozenset({"pending", "booked", "arrived", "fulfilled", "noshow", "checked-in"})


def is_session_booking(resource: Mapping[str, Any]) -> bool:
    """An Appointment booking a KaT session (serviceType kat-service#kat-session)."""
    return resource.get("resourceType") == "Appointment" and any(
        isinstance(c, Mapping) and c.get("system") == SERVICE and c.get("code") == SESSION_CODE
        for concept in resource.get("serviceType") or []
        if isinstance(concept, Mapping)
        for c in concept.get("coding") or []
    )


def booking_problems(resource: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What a KaT session booking lacks for the worklist and the program to use it, as
    (message, element): one Patient participant, its session number, and a start and end
    (in order) unless proposed, cancelled or waitlisted (R4 invariant app-3, which the
    validator does not check)."""
    problems: list[tuple[str, str]] = []
    patients = [
        p
        for p in resource.get("participant") or []
        if isinstance(p, Mapping)
        and str((p.get("actor") or {}).get("reference", "")).startswith("Patient/")
    ]
    if len(patients) != 1:
        problems.append(("a KaT session booking names one Patient as participant", "participant"))
    numbers = [
        e.get("valueInteger")
        for e in resource.get("extension") or []
        if isinstance(e, Mapping) and e.get("url") == SESSION_NUMBER
    ]
    if len(numbers) != 1 or not isinstance(numbers[0], int) or numbers[0] < 1:
        problems.append(
            (f"a KaT session booking carries its session number ({SESSION_NUMBER})", "extension")
        )
    start, end = resource.get("start"), resource.get("end")
    if resource.get("status") in _TIMED and not (start and end):
        problems.append(("a booked appointment has a start and an end (R4 app-3)", "start"))
    elif start and end and str(end) < str(start) and len(str(start)) == len(str(end)):
        problems.append(("the end is before the start", "end"))
    return problems
