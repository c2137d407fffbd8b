"""Dose safety (``fhir_kat.clinical.dose``) and the protocol file it reads
(``fhir_kat.clinical.protocol``): boundaries exact, weight required for a weight-based route,
overrides only where they are needed, routes without a range confirmed by a clinician, and the
schedule as configuration (another program's file changes the rules, not the code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhir_kat.clinical.dose import assess, dose_issues, mg_per_kg
from fhir_kat.clinical.protocol import ProtocolError, load_protocol

PROTOCOL = load_protocol()
OVERRIDE = {"reason": "agreed", "clinician": {"family_name": "X", "identifier": {}}}


def session(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "session_number": 2,
        "route": "intramuscular",
        "dose_mg": 84.0,
        "body_weight_kg": 70.0,
    }
    return {k: v for k, v in (base | values).items() if v is not None}


def where(issues: list[Any]) -> list[tuple[str, str]]:
    return [(i.code, i.expression[0]) for i in issues]


def test_the_default_protocol_is_the_papers() -> None:
    assert PROTOCOL.session_routes == {
        1: ("oral-lozenge",),
        2: ("intramuscular",),
        3: ("intramuscular",),
    }
    im = PROTOCOL.dose_limits["intramuscular"]
    assert im.weight_based and im.mg_per_kg is not None
    assert (im.mg_per_kg.min, im.mg_per_kg.max) == (1.0, 1.5)
    assert not PROTOCOL.dose_limits["oral-lozenge"].configured  # never an invented range
    assert [PROTOCOL.sessions[n].typical_week for n in (1, 2, 3)] == [4, 5, 7]


@pytest.mark.parametrize(
    ("dose", "weight", "verdict"),
    [
        (70.0, 70.0, "in-range"),  # exactly 1.0
        (105.0, 70.0, "in-range"),  # exactly 1.5: no float rounding at the boundary
        (105.1, 70.0, "out-of-range"),
        (69.9, 70.0, "out-of-range"),
        (0.3, 0.2 + 0.1, "out-of-range"),  # 0.30000000000000004 kg is read as sent
        (100.5, 67.0, "in-range"),
    ],
)
def test_boundaries_are_exact(dose: float, weight: float, verdict: str) -> None:
    assert assess(session(dose_mg=dose, body_weight_kg=weight), PROTOCOL).verdict == verdict


def test_mg_per_kg_rounds_for_display_only() -> None:
    assert mg_per_kg(100.0, 3.0) == 33.333


def test_in_range_dose_passes() -> None:
    assert dose_issues(session(), PROTOCOL) == []


def test_out_of_range_needs_an_override() -> None:
    issues = dose_issues(session(dose_mg=140.0), PROTOCOL)
    assert where(issues) == [("business-rule", "dose_mg")]
    assert "2 mg/kg" in issues[0].diagnostics and "1-1.5 mg/kg" in issues[0].diagnostics
    assert dose_issues(session(dose_mg=140.0, dose_override=OVERRIDE), PROTOCOL) == []


def test_an_override_on_a_dose_inside_the_range_is_refused() -> None:
    issues = dose_issues(session(dose_override=OVERRIDE), PROTOCOL)
    assert where(issues) == [("business-rule", "dose_override")]


def test_weight_is_required_for_a_weight_based_route_even_with_an_override() -> None:
    for extra in ({}, {"dose_override": OVERRIDE}):
        issues = dose_issues(session(body_weight_kg=None, **extra), PROTOCOL)
        assert where(issues) == [("required", "body_weight_kg")]


def test_a_route_without_a_range_needs_a_clinician_override() -> None:
    oral = session(session_number=1, route="oral-lozenge", dose_mg=200.0, body_weight_kg=None)
    assert where(dose_issues(oral, PROTOCOL)) == [("business-rule", "dose_override")]
    assert dose_issues(oral | {"dose_override": OVERRIDE}, PROTOCOL) == []
    assert assess(oral, PROTOCOL).verdict == "no-range"


def test_the_route_must_be_the_sessions() -> None:
    issues = dose_issues(session(session_number=1), PROTOCOL)
    assert ("business-rule", "route") in where(issues)
    assert where(dose_issues(session(session_number=4), PROTOCOL))[0] == (
        "business-rule",
        "session_number",
    )


def test_a_schedule_deviation_with_reason_and_clinician_records_what_was_given() -> None:
    """Principle 3: session 1 given IM, or a session 4 for an alumnus, is accepted with a
    recorded deviation; entry errors stay refused; a deviation where there is none is refused."""
    deviation = {"reason": "lozenge not tolerated", "clinician": OVERRIDE["clinician"]}
    im_first = session(session_number=1, schedule_deviation=deviation)
    assert dose_issues(im_first, PROTOCOL) == []  # 1.2 mg/kg, inside the IM range
    alumni = session(session_number=4, schedule_deviation=deviation)
    assert dose_issues(alumni, PROTOCOL) == []
    # The dose rules still apply off the schedule: no weight, or out of range without override.
    no_weight = session(session_number=1, body_weight_kg=None, schedule_deviation=deviation)
    assert where(dose_issues(no_weight, PROTOCOL)) == [("required", "body_weight_kg")]
    too_much = session(session_number=4, dose_mg=700.0, schedule_deviation=deviation)
    assert where(dose_issues(too_much, PROTOCOL)) == [("business-rule", "dose_mg")]
    # A route the protocol gives no limits (sublingual) off the schedule: like a route with
    # no range, a clinician override confirms the dose.
    sublingual = session(
        session_number=1, route="sublingual", body_weight_kg=None, schedule_deviation=deviation
    )
    assert where(dose_issues(sublingual, PROTOCOL)) == [("business-rule", "dose_override")]
    assert dose_issues(sublingual | {"dose_override": OVERRIDE}, PROTOCOL) == []
    # Nothing deviates: recording a deviation would be a false statement.
    on_schedule = session(schedule_deviation=deviation)
    assert where(dose_issues(on_schedule, PROTOCOL)) == [("business-rule", "schedule_deviation")]
    # The clinician override of the session records the departure as well (the issue's
    # "session 1 given IM with an override"): its reason and clinician, whatever the dose.
    by_override = session(session_number=1, dose_override=OVERRIDE)
    assert dose_issues(by_override, PROTOCOL) == []
    assert (
        dose_issues(session(session_number=4, dose_mg=140.0, dose_override=OVERRIDE), PROTOCOL)
        == []
    )
    # Without one, the deviation is refused and the message says what to record.
    (issue,) = dose_issues(session(session_number=1), PROTOCOL)
    assert "schedule_deviation" in issue.diagnostics


def test_rules_on_fields_that_failed_validation_are_not_evaluated() -> None:
    assert dose_issues(session(body_weight_kg=None), PROTOCOL, invalid={"body_weight_kg"}) == []
    assert dose_issues(session(route=None), PROTOCOL, invalid={"route"}) == []
    assert dose_issues(session(dose_mg=500.0), PROTOCOL, invalid={"dose_override"}) == []


ANOTHER_PROGRAM = """\
id: five-week-group
version: 1
program:
  name: Another program (synthetic)
  organization: {system: https://fhir-kat.example.org/fhir/sid/organization, value: OTHER}
sessions:
  1: {routes: [sublingual]}
  2: {routes: [sublingual, intramuscular]}
dose_limits:
  sublingual: {mg: {min: 25, max: 100}}
  intramuscular: {mg_per_kg: {min: 0.5, max: 1.0}}
"""


def test_another_programs_protocol_changes_the_rules_not_the_code(tmp_path: Path) -> None:
    path = tmp_path / "protocol.yaml"
    path.write_text(ANOTHER_PROGRAM)
    other = load_protocol(path)
    assert other.reference == "five-week-group#v1"
    sublingual = session(session_number=1, route="sublingual", dose_mg=50.0, body_weight_kg=None)
    assert dose_issues(sublingual, other) == []  # a fixed mg range needs no weight
    assert where(dose_issues(sublingual | {"dose_mg": 150.0}, other)) == [
        ("business-rule", "dose_mg")
    ]
    assert where(dose_issues(session(), other)) == [("business-rule", "dose_mg")]  # 1.2 > 1.0
    assert where(dose_issues(session(session_number=3, dose_mg=56.0), other)) == [
        ("business-rule", "session_number")
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("  sublingual: {mg: {min: 25, max: 100}}\n", ""), "has no entry in dose_limits"),
        (("min: 25, max: 100", "min: 100, max: 25"), "0 < min <= max"),
        (("{mg: {min: 25, max: 100}}", "{mg: {min: 25}}"), "exactly min and max"),
        (("routes: [sublingual]}", "routes: [teleport]}"), "not in ValueSet kat-route"),
        (("version: 1\n", "version: 1\nextra: 1\n"), "unknown key 'extra'"),
        (("id: five-week-group\n", ""), "missing 'id'"),
        (
            (
                "{mg_per_kg: {min: 0.5, max: 1.0}}",
                "{mg_per_kg: {min: 0.5, max: 1.0}, mg: {min: 1, max: 2}}",
            ),
            "not both",
        ),
    ],
)
def test_protocol_problems_stop_the_service(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "protocol.yaml"
    assert change[0] in ANOTHER_PROGRAM
    path.write_text(ANOTHER_PROGRAM.replace(*change))
    with pytest.raises(ProtocolError, match=message):
        load_protocol(path)
