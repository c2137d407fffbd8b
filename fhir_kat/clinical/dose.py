"""Dose safety for a KaT session: route allowed for the session, body weight present for a
weight-based route, and mg/kg inside the protocol range unless a clinician overrides with a
reason (the override is then recorded on the MedicationAdministration)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_kat.clinical.protocol import ProgramProtocol
from fhir_kat.errors import Issue, issue


def mg_per_kg(dose_mg: float, weight_kg: float) -> float:
    return round(dose_mg / weight_kg, 3)


def dose_issues(session: Mapping[str, Any], protocol: ProgramProtocol) -> list[Issue]:
    """Every dose problem of one medication-administration artifact (already schema-valid)."""
    problems: list[Issue] = []
    number = session["session_number"]
    route = session["route"]
    allowed = protocol.session_routes.get(number)
    if allowed is None:
        problems.append(
            issue("business-rule", f"the protocol has no session {number}", "session_number")
        )
    elif route not in allowed:
        problems.append(
            issue(
                "business-rule",
                f"session {number} is given by {', '.join(allowed)} in the protocol",
                "route",
            )
        )
    dose_range = protocol.dose_ranges.get(route)
    if dose_range is None:
        return problems  # no weight-based range for this route: recorded as given
    weight = session.get("body_weight_kg")
    if weight is None:
        problems.append(
            issue("required", f"a body weight is required for the {route} route", "body_weight_kg")
        )
        return problems
    ratio = mg_per_kg(session["dose_mg"], weight)
    if not dose_range.min <= ratio <= dose_range.max and not session.get("dose_override"):
        problems.append(
            issue(
                "business-rule",
                f"{ratio:g} mg/kg is outside the protocol range {dose_range.min:g}-"
                f"{dose_range.max:g} mg/kg for {route}; a clinician override with a reason is "
                "required",
                "dose_mg",
            )
        )
    return problems
