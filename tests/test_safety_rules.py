"""The safety rules as configuration (``mappings/program/safety.yaml`` and ``[program.safety]``)
and the pure rules of ``fhir_kat.clinical.safety``: limits exact at their boundaries, units
converted, unknown codes sent to review, a bad configuration refused naming every problem."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_kat.clinical.safety import (
    DEFAULT,
    FLAG_PRIORITY,
    FLAG_PRIORITY_SYSTEM,
    SAFETY_SYSTEM,
    SafetyRulesError,
    adverse_event_signal,
    body_weight_kg,
    dose_ceiling_signal,
    flag_for,
    load_safety_rules,
    prerequisite_signals,
    vital_sign_signals,
    weight_signal,
)
from fhir_kat.settings import Settings, SettingsError
from fhir_kat.terminology import load_terminology
from tests.support.clinical import adverse_event
from tests.support.conformance import assert_conformant

RULES = load_safety_rules()
LOINC = "http://loinc.org"
SUBJECT = {"reference": "Patient/p1"}


def obs(code: str, value: float, unit: str = "mm[Hg]", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": SUBJECT,
        "effectiveDateTime": "2026-02-10T12:00:00Z",
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit},
        **extra,
    }


def test_the_defaults_are_the_ones_the_issue_names() -> None:
    assert RULES.vital_signs["systolic_mmhg"].at_or_above == 180
    assert RULES.vital_signs["diastolic_mmhg"].at_or_above == 110
    assert RULES.vital_signs["spo2_percent"].below == 90
    assert RULES.dose_ceilings["intramuscular"].mg_per_kg == 1.5
    assert RULES.max_weight_change == pytest.approx(0.1)
    assert "suicidality" in RULES.flag_event_kinds and RULES.flag_serious_events


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected"),
    [
        ("8480-6", 179, "mm[Hg]", []),
        ("8480-6", 180, "mm[Hg]", ["systolic-bp-high"]),
        ("8462-4", 110, "mm[Hg]", ["diastolic-bp-high"]),
        ("59408-5", 90, "%", []),
        ("59408-5", 89, "%", ["spo2-low"]),
        ("2708-6", 85, "%", ["spo2-low"]),
        ("8867-4", 190, "/min", []),  # no heart-rate limit is configured
    ],
)
def test_vital_sign_limits_are_exact(
    code: str, value: float, unit: str, expected: list[str]
) -> None:
    found = vital_sign_signals(obs(code, value, unit), "o1", RULES)
    assert [s.code for s in found] == expected


def test_withdrawn_readings_raise_nothing() -> None:
    assert vital_sign_signals(obs("8480-6", 220, status="entered-in-error"), "o1", RULES) == []


def test_body_weight_units_and_the_earlier_weights() -> None:
    assert body_weight_kg(obs("29463-7", 154.32, "[lb_av]")) == pytest.approx(70.0, abs=0.01)
    assert body_weight_kg(obs("29463-7", 70000, "g")) == 70
    assert body_weight_kg(obs("29463-7", 70, "stone")) is None  # not guessed
    earlier = [("2026-01-01T00:00:00Z", 70.0, "w0"), ("2026-01-20T00:00:00Z", 71.0, "w1")]
    assert weight_signal(obs("29463-7", 77, "kg"), "w2", earlier, RULES) is None  # 8.5 %
    far = weight_signal(obs("29463-7", 154, "kg"), "w2", earlier, RULES)
    assert far is not None and far.details == ("Observation/w1",)
    # Weights recorded after this one are the reference only when there is no earlier one.
    later = [("2026-03-01T00:00:00Z", 154.0, "w9")]
    assert weight_signal(obs("29463-7", 70, "kg"), "w2", earlier + later, RULES) is None


def test_dose_ceiling_in_mg_per_kg_and_mg() -> None:
    ma = {"resourceType": "MedicationAdministration", "subject": SUBJECT}
    assert dose_ceiling_signal(ma, "m", "intramuscular", 105.0, 70.0, RULES) is None  # 1.5
    assert dose_ceiling_signal(ma, "m", "intramuscular", 106.0, 70.0, RULES) is not None
    assert dose_ceiling_signal(ma, "m", "intramuscular", 700.0, None, RULES) is None  # no weight
    assert dose_ceiling_signal(ma, "m", "oral-lozenge", 5000.0, None, RULES) is None
    mg = load_safety_rules({"dose_ceilings": {"intramuscular": {"mg": 150}}})
    found = dose_ceiling_signal(ma, "m", "intramuscular", 200.0, None, mg)
    assert found is not None and "200 mg is above the ceiling of 150 mg" in found.text


def _ae(kind: str | None, seriousness: str | None, **extra: Any) -> dict[str, Any]:
    return adverse_event(kind, seriousness, SUBJECT["reference"], **extra)


@pytest.mark.parametrize(
    ("kind", "seriousness", "code"),
    [
        ("nausea", "Non-serious", None),
        ("nausea", "Serious", "adverse-event-serious"),
        ("nausea", "SeriousIsLifeThreatening", "adverse-event-serious"),
        ("suicidality", "Non-serious", "adverse-event-suicidality"),
        ("suicidality", None, "adverse-event-suicidality"),
        ("nausea", None, "adverse-event-unclassified"),
        (None, "Non-serious", "adverse-event-unclassified"),
    ],
)
def test_adverse_event_classification(
    kind: str | None, seriousness: str | None, code: str | None
) -> None:
    found = adverse_event_signal(_ae(kind, seriousness), "a1", RULES)
    assert (found.code if found else None) == code


def test_a_potential_adverse_event_raises_nothing() -> None:
    assert (
        adverse_event_signal(_ae("suicidality", "Serious", actuality="potential"), "a", RULES)
        is None
    )


def test_dosing_prerequisites() -> None:
    ma = {"resourceType": "MedicationAdministration", "subject": SUBJECT}

    def codes(tasks: list[tuple[str, str]], consent: bool) -> list[str]:
        return [s.code for s in prerequisite_signals(ma, "m", tasks, consent)]

    assert codes([("t", "in-progress")], True) == []
    assert codes([("t", "accepted"), ("t2", "rejected")], True) == []
    assert codes([("t", "rejected")], True) == ["dosing-referral-rejected"]
    assert codes([("t", "cancelled")], True) == ["dosing-referral-closed"]
    assert codes([("t", "on-hold"), ("t2", "rejected")], True) == ["dosing-intake-incomplete"]
    assert codes([], False) == ["dosing-without-referral", "dosing-without-treatment-consent"]


def test_a_flag_is_valid_r4() -> None:
    (signal,) = vital_sign_signals(obs("8480-6", 200), "o1", RULES)
    flag = flag_for(signal, RULES)
    assert_conformant(flag)
    assert flag["extension"][0]["valueReference"] == {"reference": "Observation/o1"}


def test_every_flag_carries_the_priority_its_rules_give_its_code() -> None:
    """The urgency is data (safety.yaml ``flag_priority``), carried on the Flag as the R4
    flag-priority extension; a priority without a clinical source says it awaits review."""
    (signal,) = vital_sign_signals(obs("8480-6", 200), "o1", RULES)
    flag = flag_for(signal, RULES)
    (ext,) = [e for e in flag["extension"] if e["url"] == FLAG_PRIORITY]
    assert ext["valueCodeableConcept"]["coding"] == [
        {"system": FLAG_PRIORITY_SYSTEM, "code": "PM", "display": "Medium priority"}
    ]
    assert ext["valueCodeableConcept"]["text"] == (
        "Medium priority (program decision awaiting clinical review)"
    )
    # Every kat-safety code has one; the ones resting on a source cite it.
    codes = set(load_terminology().code_systems[SAFETY_SYSTEM])
    assert set(RULES.priorities) == codes
    assert RULES.priorities["phq9-item9-positive"].code == "PH"
    assert "44260-8" in (RULES.priorities["phq9-item9-positive"].source or "")
    for code, priority in RULES.priorities.items():
        assert priority.code in ("PN", "PL", "PM", "PH"), code
        if priority.source:
            assert "DOMAIN.md" in priority.source, code  # a source the project relies on


def test_a_priority_is_required_for_every_code_and_says_where_it_comes_from(
    tmp_path: Path,
) -> None:
    with pytest.raises(SafetyRulesError) as err:
        load_safety_rules(
            {
                "flag_priority": {
                    "spo2-low": {"priority": "URGENT", "review": "pending"},
                    "heart-rate-low": {"priority": "PH", "source": "x", "review": "pending"},
                    "levitation": {"priority": "PH", "review": "pending"},
                }
            }
        )
    text = str(err.value)
    for part in (
        "flag_priority.spo2-low: give priority",
        "flag_priority.heart-rate-low: give source",
        "flag_priority.levitation: not a code",
    ):
        assert part in text, part
    # A program's own rules file: a code left out, or neither a source nor a pending review.
    own = yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))
    own["flag_priority"].pop("schedule-deviation")
    own["flag_priority"]["spo2-high"] = {"priority": "PH"}
    path = tmp_path / "safety.yaml"
    path.write_text(yaml.safe_dump(own), encoding="utf-8")
    with pytest.raises(SafetyRulesError) as err:
        load_safety_rules(path=path)
    assert "flag_priority.schedule-deviation: missing" in str(err.value)
    assert "flag_priority.spo2-high: give source" in str(err.value)
    merged = load_safety_rules({"flag_priority": {"spo2-low": {"priority": "PL"}}})
    assert merged.priorities["spo2-low"].code == "PL"  # merged: review: pending stays


def test_overrides_and_every_problem_of_a_bad_configuration() -> None:
    lower = load_safety_rules({"vital_signs": {"systolic_mmhg": {"at_or_above": 170}}})
    assert lower.vital_signs["systolic_mmhg"].at_or_above == 170
    assert lower.vital_signs["diastolic_mmhg"].at_or_above == 110  # the rest stays
    with pytest.raises(SafetyRulesError) as err:
        load_safety_rules(
            {
                "vital_signs": {"systolic_mmhg": {"above": "high"}, "temperature": {}},
                "dose_ceilings": {"rectal": {"mg": -1}},
                "body_weight": {"max_relative_change": 0},
                "adverse_events": {"serious": True, "kinds": ["levitation"]},
                "surprise": 1,
            }
        )
    text = str(err.value)
    assert "unknown key 'surprise'" in text
    for part in ("vital_signs.systolic_mmhg", "temperature", "rectal", "body_weight", "levitation"):
        assert part in text, part


def test_a_bad_configuration_stops_start_up(settings: Settings) -> None:
    from fhir_kat.app import create_app

    bad = replace(
        settings,
        extra={
            **settings.extra,
            "program": {"safety": {"body_weight": {"max_relative_change": -1}}},
        },
    )
    with pytest.raises(SettingsError, match=r"\[program.safety\]"):
        create_app(bad)
