"""Eligibility triage from coded referral data: each rule alone, and the never-reject-on-missing
principle."""

from __future__ import annotations

import pytest

from fhir_kat.workflow.states import allowed, business_status, needs_reason
from fhir_kat.workflow.triage import RXNORM, SNOMED, Coding, ReferralFacts, load_rules, triage

PTSD = Coding(SNOMED, "47505003")
ICD_PTSD = Coding("http://hl7.org/fhir/sid/icd-10-ca", "F43.1")
OK_FLAGS = {"prior_treatment_failure": True}


def eligible(**changes: object) -> ReferralFacts:
    base = {"conditions": (PTSD,), "flags": dict(OK_FLAGS)}
    base.update(changes)
    return ReferralFacts(**base)  # type: ignore[arg-type]


def test_clearly_eligible() -> None:
    decision = triage(eligible())
    assert decision.outcome == "accepted" and decision.findings == ()
    assert decision.business_status == "eligible"
    assert triage(eligible(conditions=(ICD_PTSD,))).outcome == "accepted"


EXCLUSIONS = [
    ("psychosis", Coding(SNOMED, "69322001"), {}),
    ("dementia", Coding(SNOMED, "52448006"), {}),
    ("delirium", Coding(SNOMED, "2776000"), {}),
    ("coronary-artery-disease", Coding(SNOMED, "53741008"), {}),
    ("hypertension", Coding(SNOMED, "38341003"), {"uncontrolled": True}),
    ("intracerebral-haemorrhage", Coding(SNOMED, "274100004"), {}),
    ("hepatic-cirrhosis", Coding(SNOMED, "19943007"), {}),
    ("hepatorenal", Coding(SNOMED, "51292008"), {}),
    ("pregnancy", Coding(SNOMED, "77386006"), {}),
    ("breastfeeding", Coding(SNOMED, "1260078007"), {}),
    ("psychosis", Coding("http://hl7.org/fhir/sid/icd-10", "F20.0"), {}),
]


@pytest.mark.parametrize(("criterion", "coding", "flags"), EXCLUSIONS)
def test_each_exclusion_alone_rejects_and_is_named(
    criterion: str, coding: Coding, flags: dict[str, bool]
) -> None:
    decision = triage(eligible(conditions=(PTSD, coding), flags={**OK_FLAGS, **flags}))
    assert decision.outcome == "rejected"
    assert [f.criterion for f in decision.findings] == [criterion]


def test_flag_and_allergy_exclusions() -> None:
    allergy = triage(eligible(allergies=(Coding(RXNORM, "6130"),)))
    assert [f.criterion for f in allergy.findings] == ["ketamine-hypersensitivity"]
    meds = triage(eligible(flags={**OK_FLAGS, "recent_mood_medication_change": True}))
    assert meds.outcome == "rejected"


def test_inclusion_not_met_rejects_but_missing_data_holds() -> None:
    no_failure = triage(eligible(flags={"prior_treatment_failure": False}))
    assert no_failure.outcome == "rejected"
    assert no_failure.findings[0].kind == "inclusion-not-met"
    unknown_failure = triage(eligible(flags={}))
    assert unknown_failure.outcome == "on-hold"
    assert unknown_failure.findings[0].criterion == "prior-treatment-failure"
    other_dx = triage(
        eligible(
            conditions=(Coding(SNOMED, "38341003"),), flags={**OK_FLAGS, "uncontrolled": False}
        )
    )
    assert other_dx.outcome == "rejected"
    assert triage(eligible(conditions=())).outcome == "on-hold"
    text_only = triage(eligible(conditions=(), uncoded_conditions=1))
    assert text_only.outcome == "on-hold" and text_only.findings[0].kind == "missing"


def test_relative_exclusions_go_to_a_clinician() -> None:
    lability = triage(eligible(flags={**OK_FLAGS, "extreme_emotional_lability": True}))
    assert lability.outcome == "on-hold" and lability.business_status == "needs-review"
    htn = triage(eligible(conditions=(PTSD, Coding(SNOMED, "38341003"))))
    assert htn.outcome == "on-hold"
    assert [f.criterion for f in htn.findings] == ["hypertension-control-unknown"]


def test_rules_are_data_with_a_version() -> None:
    rules = load_rules()
    assert rules["version"] >= 1
    ids = [r["id"] for r in rules["exclusion"]]
    assert len(ids) == len(set(ids))


def test_task_state_machine() -> None:
    assert allowed("requested", "accepted") and allowed("on-hold", "rejected")
    assert allowed("accepted", "in-progress") and allowed("in-progress", "completed")
    assert not allowed("completed", "in-progress") and not allowed("requested", "completed")
    assert needs_reason("rejected") and not needs_reason("accepted")
    assert business_status("eligible")["coding"][0]["code"] == "eligible"
