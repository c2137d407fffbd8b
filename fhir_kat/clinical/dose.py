"""Dose safety for one KaT dosing session, against the program protocol.

Owns: the rules — the route must be one the protocol allows for the session number, and the
session one the protocol has, unless a ``schedule_deviation`` records why and the responsible
clinician (what was given is recorded, and a safety Flag raised: never an undocumented
controlled-drug administration); a weight-based route needs the session's body weight; a dose
outside the route's range, or on a route with no configured range, needs an explicit clinician
override with a reason; an override or a deviation where there is none is refused (it would
record a false statement). Must not: guess a weight, a range or a dose, store, call HTTP, or
read the clock.

Arithmetic is exact (``Fraction`` of the decimal values as sent): 105 mg / 70 kg is 1.5 mg/kg
and inside a 1-1.5 range, with no float rounding at the boundary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from fhir_kat.clinical.protocol import DoseRange, ProgramProtocol, RouteLimits
from fhir_kat.errors import Issue, issue

#: in-range: no override needed; out-of-range / no-range: an override is required;
#: unknown: the inputs are missing or invalid (reported elsewhere), nothing can be said.
Verdict = Literal["in-range", "out-of-range", "no-range", "unknown"]

DOSE_INPUTS = (
    "session_number",
    "route",
    "dose_mg",
    "body_weight_kg",
    "dose_override",
    "schedule_deviation",
)


def _exact(value: float | int) -> Fraction:
    return Fraction(str(value))


def mg_per_kg(dose_mg: float, weight_kg: float) -> float:
    """mg/kg for display and the record, rounded to 3 decimals (checks use exact values)."""
    return round(float(_exact(dose_mg) / _exact(weight_kg)), 3)


@dataclass(frozen=True)
class DoseAssessment:
    verdict: Verdict
    route: str | None
    range: DoseRange | None = None
    mg_per_kg: float | None = None

    @property
    def needs_override(self) -> bool:
        return self.verdict in ("out-of-range", "no-range")


def assess(session: Mapping[str, Any], protocol: ProgramProtocol) -> DoseAssessment:
    """Where the session's dose stands against the protocol's limits for its route."""
    route, dose, weight = (session.get(k) for k in ("route", "dose_mg", "body_weight_kg"))
    limits = protocol.dose_limits.get(route) if isinstance(route, str) else None
    ratio = mg_per_kg(dose, weight) if dose is not None and weight else None
    if dose is None:
        return DoseAssessment("unknown", route, mg_per_kg=ratio)
    if limits is None:
        # A route the protocol gives no limits at all (only accepted off the schedule, with a
        # recorded deviation): no range exists, as for a route configured with none.
        return DoseAssessment(
            "no-range" if isinstance(route, str) else "unknown", route, None, ratio
        )
    if limits.mg_per_kg is not None:
        if not weight:
            return DoseAssessment("unknown", route, limits.mg_per_kg)
        value = _exact(dose) / _exact(weight)
        rng = limits.mg_per_kg
    elif limits.mg is not None:
        value, rng = _exact(dose), limits.mg
    else:
        return DoseAssessment("no-range", route, mg_per_kg=ratio)
    inside = _exact(rng.min) <= value <= _exact(rng.max)
    return DoseAssessment("in-range" if inside else "out-of-range", route, rng, ratio)


def dose_issues(
    session: Mapping[str, Any], protocol: ProgramProtocol, *, invalid: Collection[str] = ()
) -> list[Issue]:
    """Every dose problem of one medication-administration artifact.

    ``invalid`` names fields that already failed the schema: rules depending on them are not
    evaluated (their problem is already reported, and a second, derived one would mislead)."""
    if any(f in invalid for f in ("session_number", "route", "dose_mg")):
        return []
    problems: list[Issue] = []
    number, route = session.get("session_number"), session.get("route")
    deviation = session.get("schedule_deviation")
    planned = schedule_deviation(session, protocol)
    # Off the schedule, a clinician override of the session (dose_override: a reason and the
    # responsible clinician) records the departure too, when no schedule_deviation is given.
    covered_by_override = planned is not None and not deviation and session.get("dose_override")
    if (
        planned is not None
        and not deviation
        and not covered_by_override
        and not {"schedule_deviation", "dose_override"} & set(invalid)
    ):
        problems.append(
            issue(
                "business-rule",
                f"{planned}; record what was given with schedule_deviation (the reason and the "
                "responsible clinician)",
                "route" if number in protocol.sessions else "session_number",
            )
        )
    elif planned is None and deviation and number is not None and route is not None:
        problems.append(
            issue(
                "business-rule",
                f"session {number} by {route} is on the protocol schedule, so there is no "
                "deviation to record; remove schedule_deviation or correct the session or route",
                "schedule_deviation",
            )
        )
    limits = protocol.dose_limits.get(route) if route is not None else None
    if route is None or session.get("dose_mg") is None:
        return problems
    if limits is None and (deviation or covered_by_override):
        # A route off the schedule with no dose limits in the protocol: no range exists, so
        # the dose is confirmed by a clinician override, as for any route without a range.
        limits = RouteLimits(route=route)
    if limits is None:
        if not problems:  # the session rule has not already named the route
            problems.append(
                issue("business-rule", f"the protocol has no dose limits for {route}", "route")
            )
        return problems
    if limits.weight_based and session.get("body_weight_kg") is None:
        if "body_weight_kg" not in invalid:
            problems.append(
                issue(
                    "required",
                    f"a body weight is required for the {route} route (dose in mg/kg)",
                    "body_weight_kg",
                )
            )
        return problems
    if "body_weight_kg" in invalid or "dose_override" in invalid:
        return problems
    verdict = assess(session, protocol)
    override = session.get("dose_override")
    if verdict.verdict == "out-of-range" and not override:
        shown = (
            f"{verdict.mg_per_kg:g} mg/kg"
            if limits.weight_based and verdict.mg_per_kg is not None
            else f"{session['dose_mg']:g} mg"
        )
        problems.append(
            issue(
                "business-rule",
                f"{shown} is outside the protocol range "
                f"{verdict.range.text() if verdict.range else ''} for {route}; a clinician "
                "override with a reason is required",
                "dose_mg",
            )
        )
    elif verdict.verdict == "no-range" and not override:
        problems.append(
            issue(
                "business-rule",
                f"the protocol configures no dose range for {route}; every dose on this route "
                "needs a clinician override with a reason",
                "dose_override",
            )
        )
    elif verdict.verdict == "in-range" and override and not covered_by_override:
        problems.append(
            issue(
                "business-rule",
                "the dose is inside the protocol range, so there is nothing to override; remove "
                "dose_override or correct the dose or weight",
                "dose_override",
            )
        )
    return problems


def schedule_deviation(session: Mapping[str, Any], protocol: ProgramProtocol) -> str | None:
    """How the session departs from the protocol's schedule, in words (None: it does not, or
    the session number or route is missing)."""
    number, route = session.get("session_number"), session.get("route")
    if number is None:
        return None
    rule = protocol.sessions.get(number)
    if rule is None:
        known = ", ".join(str(n) for n in sorted(protocol.sessions))
        return f"protocol {protocol.reference} has no session {number} (sessions {known})"
    if route is not None and route not in rule.routes:
        return (
            f"session {number} is given by {', '.join(rule.routes)} in protocol "
            f"{protocol.reference}, not {route}"
        )
    return None
