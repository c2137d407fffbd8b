"""What makes a resource a referral: the program's ServiceRequest and its Task.

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
